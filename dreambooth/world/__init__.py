"""The shapes world: a tiny world where training visibly learns, its pretrained base model and an evaluator.

Public API (import from the submodules):

- ``scenes``: ``Scene``, ``draw(scene)``, ``caption(scene, colour=True, background=True)``,
  ``random_scene(rng, ...)``, ``SUBJECT`` and ``subject_images(count, seed)``.
- ``model.write_world_checkpoint(out_path)``: the shipped base model (checked against world.json) as an SD 1.x
  single file; ``model.world_configs()``.
- ``evaluator.load_evaluator()`` -> ``Evaluator.judge(images)`` -> ``Judgement`` (shape, colour, background,
  dot); ``rate``, ``appearance``, ``total_variation``.
- ``demo``: the demo's subject dataset (``write_subject_dataset``) and settings (``DEMO_SETTINGS``,
  ``DEMO_CONCEPT``).
- ``build`` (``python -m dreambooth.world.build``) rebuilds the shipped files; ``outcomes``
  (``python -m dreambooth.world.outcomes``) measures (a)-(e).
"""
