"""Configuration: one TOML file (``load``) read table by table (``table``, ``sections``,
``checks``) into frozen typed settings (``settings``)."""
