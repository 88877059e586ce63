"""OCI images for sbx: registry client, content-addressed store, safe unpacking, builder.

Modules, one concern each (dependencies point up this list):
  reference   image reference grammar (Docker's), default registry from settings
  model       OCI / Docker schema 2 documents as msgspec Structs, media types, ImageConfig
  transport   pooled HTTP/1.1 with retries and redirects (stdlib http.client)
  auth        docker config.json credentials, Basic, Bearer token flow
  registry    the distribution API: manifests, indexes, verified blobs, push
  extract     safe unprivileged layer unpacking; OCI whiteouts -> overlayfs xattr whiteouts
  store       blobs/, layers/, refs/ under settings.images_dir; locks; prune
  pull        registry <-> store: pull (if missing) and push, progress events
  dockerfile  the Dockerfile subset of images/<name>/
  layertar    reproducible layer tarballs
  build       the image builder with its per-step layer cache
"""
