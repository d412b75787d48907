"""Stable Diffusion models: tokenizer, components, tiny models, single-file import and export.

What differs between model families (detection, text encoders and their key prefixes, pipeline class,
name tables, host markers) lives in the family units, dreambooth/families; the code here applies them.

Public API (import from the submodules; nothing heavy is imported here):

- ``tokenizer.load_clip_tokenizer(pad_token=None)`` - the real CLIP tokenizer from the shipped files.
- ``components.Components`` - family, denoiser (UNet or transformer), vae, text_encoders, tokenizers, noise_scheduler,
  prediction_type, extras; ``.model_family`` is the family unit (dreambooth.families.ModelFamily).
- ``components.load_components(working_dir, dtype=torch.float32)`` /
  ``components.save_components(components, working_dir)`` - the model's working/ folder (atomic save).
- ``components.build_pipeline(components, scheduler_name="ddim")`` - a diffusers sampling pipeline
  ('ddim', 'euler', 'euler_a', 'dpmpp_2m').
- ``tiny.tiny_components(family, seed=0)`` - tiny random models of every registered family.
- ``export.export_checkpoint(components, out_path, precision="fp32", metadata=None, base=None, warn=None)``
  and ``export.precision_loss_fraction(trained, base, precision)`` / ``export.precision_warning``.
- ``loading.detect_family(state_dict)`` (the architecture's base family from the keys alone),
  ``loading.load_checkpoint(path, family=None, prediction_type=None)``,
  ``loading.load_source(path_or_folder, ...)``, ``loading.create_model(store, name, source, family=None,
  prediction_type=None)``.
- ``demo.write_demo_checkpoint(family, out_path, seed=0)``.
"""
