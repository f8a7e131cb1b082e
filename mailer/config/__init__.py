"""Configuration: one TOML file (``load``) read table by table (``table``, ``sections``,
``checks``, ``cron`` for schedules) into frozen typed settings (``settings``)."""
