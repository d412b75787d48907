from modules.paths import models_path  # noqa: F401
