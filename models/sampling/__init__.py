"""Identity and variation samplers, and the hypersphere utilities they share."""
