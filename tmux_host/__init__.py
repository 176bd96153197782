"""The tmux host: a long-running service that owns the tmux servers (see ``tmux_host.engine``) and serves
the internal HTTP API the Lambda functions call through ``tmuxi.host_client``."""
