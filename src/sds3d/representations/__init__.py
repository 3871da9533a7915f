"""3D scene representations: a hash-grid NeRF now, Gaussians and meshes later."""
