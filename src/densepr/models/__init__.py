"""Models: the DPR bi-encoder and the reader, as Hugging Face model directories.

``hf`` (the one load/save path, device and mixed-precision policy), ``encoder`` (:class:`Encoder`,
:class:`BiEncoder`: the whole dual encoder on one screen), ``reader`` (:class:`Reader`: DPR's span and
passage-selection heads). Reads and writes model directories (safetensors + densepr settings + manifest).
"""
