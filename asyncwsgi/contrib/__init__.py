"""Integrations with web frameworks, each importable only where that framework is installed."""
