from pie_operator.cli import main

main()
