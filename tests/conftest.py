pytest_plugins = ["tests.fixtures_mongo"]
