from hediff.desktop.cli import run

run()
