"""The ground floor of parallelism: layouts and meshes, process groups, DTensor blocks."""
