"""Optional integrations with other frameworks (Flower, Ray), behind extras."""
