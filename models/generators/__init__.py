"""Face generators: Arc2Face (embedding-conditioned diffusion) and StyleGAN2 (latent space)."""
