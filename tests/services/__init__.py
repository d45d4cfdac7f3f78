# Real services (dockerd, registry, SeaweedFS) started by the tests.
