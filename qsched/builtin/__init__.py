"""The built-in model world: a small real text-to-image model trained on Fashion-MNIST.

Submodules (imported on demand, never here):

* the model: ``data`` (IDX loader), ``captions`` (class names, caption templates,
  prompt lists), ``text`` (the frozen MiniLM text encoder), ``unet`` (denoiser and
  scheduler configurations), ``pipeline`` (``QSchedBuiltinPipeline``);
* the rectified-flow model (``builtin-flow``, FLUX.1-schnell-like): ``flow`` (transformer,
  scheduler, FLUX packing), ``flow_pipeline`` (``QSchedBuiltinFlowPipeline``);
* training: ``train`` (the ``qsched train`` commands), ``train_common`` (loop,
  checkpoints, resume), ``train_teacher``, ``train_student`` (LCM distillation),
  ``train_flow_teacher``, ``train_flow_student`` (consistency distillation in the flow
  parameterisation), ``quick_eval`` (sample grids);
* its scorers and metrics: ``clip`` / ``clip_train`` (the small CLIP and its
  training), ``degrade`` (graded degradations the CLIP learns quality from),
  ``effnet`` (EfficientNet-Lite0 features), ``fid`` (reference statistics).

See ``MODEL_CARD.md`` and ``SCORERS.md``.
"""
