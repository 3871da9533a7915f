"""sds3d's own learned prior: a small text-conditioned pixel diffusion model of the synthetic world,
trained from this repository (`sds3d prior train`) and loaded like any diffusers model."""
