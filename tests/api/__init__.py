"""The public API: functional, modules, factory, validation, capabilities, torch.compile, adversarial inputs."""
