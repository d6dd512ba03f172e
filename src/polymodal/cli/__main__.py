from polymodal.cli.main import app

app()
