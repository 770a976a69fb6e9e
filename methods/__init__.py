"""Efficiency methods, one file each. Every module here is imported by bench.registry on first use;
decorate a `bench.registry.Method` subclass with `@register_method("name")` to add one."""
