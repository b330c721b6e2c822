"""The Ray Serve application: an OpenAI-compatible API for chat about images and image creation.

Modules: `config` (ServeConfig), `schemas` (OpenAI request/response bodies),
`limits` (auth, caps, input images, errors), `model` (the model deployment: batched
images, continuously batched chat), `app` (the HTTP ingress and `build_app`). Importing the
package starts nothing and opens no storage.
"""
