"""The speaker model: the avatar scene, the talking head (Gaussians + deformation), the bundle."""
