"""Model definitions: pure nn.Modules, no distributed imports."""
