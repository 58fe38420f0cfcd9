"""Mesh extraction, UV unwrap, texture bake and file export."""
