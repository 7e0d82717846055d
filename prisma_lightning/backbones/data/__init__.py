"""Package data for the backbones: ImageNet-1k class names and CLIP prompt templates (JSON, read lazily).

``imagenet_classes.json`` holds the 1000 human-readable ImageNet-1k class names used by OpenAI CLIP's
zero-shot evaluation, in class-index order; ``clip_templates.json`` holds CLIP's 80 ImageNet prompt
templates, each a string with a ``{}`` where the class name goes. Both were generated once from
``open_clip.zero_shot_metadata`` (``IMAGENET_CLASSNAMES``, ``OPENAI_IMAGENET_TEMPLATES``).
Use :func:`prisma_lightning.backbones.zero_shot.imagenet_class_names` and
:func:`~prisma_lightning.backbones.zero_shot.clip_templates` to read them.
"""
