"""Training: the static fit of the Gaussians, then the deformation."""
