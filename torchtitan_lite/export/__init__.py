"""Hugging Face conversion, both ways."""
