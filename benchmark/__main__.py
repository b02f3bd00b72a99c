from poisonbench.cli import main

main()
