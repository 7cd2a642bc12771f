"""Face generators: Arc2Face (embedding-conditioned diffusion); StyleGAN2 comes later."""
