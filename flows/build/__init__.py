"""The build stage: base images, wheelhouses, build contexts, image builds and pushes."""
