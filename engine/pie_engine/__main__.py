from pie_engine.cli import main

main()
