"""The registry server: the HTTP API over Storage and Builders."""
