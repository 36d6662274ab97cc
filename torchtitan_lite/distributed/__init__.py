"""Parallelism: process groups, meshes, AC → compile → FSDP2."""
