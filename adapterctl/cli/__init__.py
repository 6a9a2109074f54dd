"""The command line: parse, call one library function, render its result or error."""
