//! Plan files: the optimised graph, its weights and the build settings.
