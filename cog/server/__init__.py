"""The cog server: the package registry's HTTP API, over Storage and Builders."""
