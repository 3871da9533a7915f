"""Diffusion priors that guide a 3D scene by score distillation, one file per prior family.
`base.py` holds the protocol every prior implements and the SDS step they share."""
