from diskport.cli import main

main()
