models_path = "/nonexistent/models"  # tests set it
