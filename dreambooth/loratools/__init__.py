"""LoRA tools: extract, resize and merge LoRAs, and read the LoRA files of other trainers.

Pure functions over state dicts and models (import from the submodules):

- ``read``: ``LoraModule``, ``LoraFile``, ``KeyTable``, ``key_table(family, unet, text_encoders)``,
  ``components_key_table(components)``, ``family_key_table(family)``, ``full_size_components(family)``,
  ``read_lora(tensors, metadata, table)``, ``load_lora(path, table=None, family=None)``, ``split_key``,
  ``guess_family``.
- ``extract``: ``RankRule(mode, value, max_rank)``, ``choose_rank``, ``extract_lora(trained, base, rule, conv_rule)``.
- ``resize``: ``resize_lora(lora, rule)``, ``resize_module``, ``product_svd``.
- ``merge``: ``merge_into_components(components, [(lora, weight)], table)``, ``merge_loras([(lora, weight)], rule)``,
  ``host_change``.
- ``file_merge``: ``merge_into_file(source, [(lora, weight)], target, precision, metadata)`` (SD3 / Flux: the LoRAs
  merged into the checkpoint's own file, streamed), ``merges_in_file(checkpoint, lora_paths)``, ``layer_names``.
- ``safetensors_stream``: ``read_header``, ``read_tensor``, ``copy_bytes``, ``write_streamed`` (one tensor at a time).
- ``files``: ``lora_tensors(lora)``, ``save_lora(lora, path, family, metadata, precision)``.
- ``report``: ``RetainedReport`` (retained fraction per block and in total).
- ``jobs``: the operations on the host's folders, used by the CLI, the service/API and the tab.
"""
