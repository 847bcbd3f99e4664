"""Coordinator: fleet registry, deployment, client-facing API."""
