"""The built-in model world: a small real text-to-image model trained on Fashion-MNIST.

Submodules (imported on demand, never here): ``data`` (IDX loader), ``captions``
(class names, caption templates, prompt lists), ``text`` (the frozen MiniLM text
encoder), ``unet`` (denoiser and scheduler configurations), ``pipeline``
(``QSchedBuiltinPipeline``), ``train`` (teacher / student training commands) and
``quick_eval`` (sample grids). See ``MODEL_CARD.md``.
"""
