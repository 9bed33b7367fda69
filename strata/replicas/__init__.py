"""Many engine replicas behind one OpenAI endpoint: Ray actors, a router by load, live migration."""
