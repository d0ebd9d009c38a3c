"""Models: CLIP-shaped ViTs, the released Unicom architecture, frozen foundation models.

Every model that the pipeline can use to embed images is wrapped as an
:class:`unicom.models.encoders.Encoder`; :func:`unicom.models.encoders.load_encoder`
turns a name or a path into one.
"""
