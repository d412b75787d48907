"""Names vulture reports as unused that are used where it cannot see: one line each, with the reason.

Read only by vulture (`python -m vulture dreambooth scripts tools/vulture_whitelist.py`, run by
tests/test_layout.py). An attribute access on `_` marks a name as used.
"""
# ruff: noqa: B018

from types import SimpleNamespace

_ = SimpleNamespace()

_.settings_markdown  # generates docs/SETTINGS.md; tests/config/test_docs.py checks the file against it
_.weight_decay  # schema field, read by name from train/optim.py's parameter-group table
_.text_encoder_weight_decay  # schema field, read by name from train/optim.py's parameter-group table
_.activations_other_checkpointing  # MemoryEstimate field: what the other checkpointing setting would need
_.trainable_params  # MemoryEstimate field: the count the gradient and optimizer estimates derive from
_.sampling_steps  # attribute of the web UI's shared.state that its progress bar reads
_.sampling_step  # attribute of the web UI's shared.state that its progress bar reads
_.textinfo  # attribute of the web UI's shared.state that its progress bar shows
_.build_clip_vocab  # rebuilds the shipped tokenizer files from open_clip's BPE file (byte-for-byte, tested)
_.open_clip_vocab_path  # where build_clip_vocab's input lies, found without importing open_clip
_.started_at  # TrainStatus field, sent to the tab and the REST API through asdict
_.finished_at  # TrainStatus field, sent to the tab and the REST API through asdict
_.is_busy  # TrainingService API: whether a job holds the GPU (scripts driving the service; tests)
_.wait  # TrainingService API: block until the job's thread ends (scripts driving the service; tests)
_.hits  # LatentCache counter: proves in tests that cached latents are reused, not recomputed
_.misses  # LatentCache counter: proves in tests that each latent is encoded once
_.read_jsonl  # reader of the metrics.jsonl the logger writes, kept beside the writer so they cannot drift
_.merge_lora  # folds trained LoRA layers into the base weights: the reference the LoRA export is tested against
_.apply_host_lora  # loads an exported LoRA with the web UI's name matching: proves the files load as trained
_.lr_curve  # the schedule as a list of factors, compared in tests with the scheduler the trainer builds
_.setup  # Trainer.setup: loads a run without training it (the trainer and runtime tests use it)
_.signum  # signal handler parameter, required by signal.signal's calling convention
_.frame  # signal handler parameter, required by signal.signal's calling convention
_.should_exit  # uvicorn.Server's stop flag, read by uvicorn's serving loop
_.known_incumbent_keys  # every incumbent field the importer knows: tests check docs/INCUMBENT_FIELDS.md lists them
_._body  # starlette's cache of a request body: set after a bounded read so fastapi reads the body again
_.write_demo_checkpoint  # the demo-model command calls it by name through cli._helper (a tiny random model per family)
_.module_names  # ModelFamily.denoiser_lora_keys argument: the UNet families' default ignores it, transformer families read it
_.embed_tokens  # T5 encoder stack attribute assigned to tie it to the shared embedding (transformers reads it)
_.memory_facts  # flux_model: counts Flux's activation memory from the released shapes; a test keeps the units' activation_gib equal to it
