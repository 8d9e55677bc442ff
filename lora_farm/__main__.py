from lora_farm.cli import main

main()
