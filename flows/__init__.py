"""flagrelease: the release pipeline that turns an open-source LLM and an AI chip into a verified FlagOS build."""
