"""A local Google Cloud Storage for tests: gcp-storage-emulator in a thread.

The emulator speaks GCS's JSON API on 127.0.0.1; gcsfs (epath's gs:// backend
with EPATH_USE_TF=false), TensorStore (orbax's array writer) and orbax talk to
it as to GCS through the environment of `environment()`. It lacks one call
gcsfs makes for every rename, objects.moveTo (gcsfs would retry it for ~30 s
and then copy + delete), so it is added here with GCS's semantics: copy to
the new name in the same bucket, delete the source.
"""
from __future__ import annotations

import os
import socket
from http import HTTPStatus
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from gcp_storage_emulator import server as gcs_server
from gcp_storage_emulator import settings
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

BUCKET = 'bucket'


def _move(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> None:
  p = request.params
  try:
    moved = objects._copy(request.base_url, storage, p['bucket_name'], p['object_id'],  # pylint: disable=protected-access
                          p['bucket_name'], p['dest_object_id'])
    objects._delete(storage, p['bucket_name'], p['object_id'])  # pylint: disable=protected-access
  except NotFound:
    response.status = HTTPStatus.NOT_FOUND
    return
  response.json(moved)


def _with_generation(handler: Any) -> Any:
  """A GET handler that also sends the object's generation headers, as GCS
  does: TensorStore reads them when it re-reads an object to retry a
  conditional write (without them: 'Malformed StorageGeneration')."""
  def wrapped(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> None:
    handler(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
    except (NotFound, KeyError):
      return
    response['x-goog-generation'] = str(obj['generation'])
    response['x-goog-metageneration'] = str(obj.get('metageneration', '1'))
  return wrapped


def _install_move() -> None:
  routes = tuple(
      (rf'^{prefix}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/'
       rf'(?P<dest_object_id>.*[^/]+)$', {'POST': _move})
      for prefix in (settings.API_ENDPOINT, ''))
  if not any(r[0] == routes[0][0] for r in gcs_server.HANDLERS):
    gcs_server.HANDLERS = routes + tuple(gcs_server.HANDLERS)
    for _, handlers in gcs_server.HANDLERS:
      if handlers.get('GET') in (objects.download, objects.get):
        handlers['GET'] = _with_generation(handlers['GET'])


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(port: int) -> Any:
  """An in-memory emulator with bucket BUCKET on 127.0.0.1:port (call .stop())."""
  _install_move()
  server = gcs_server.create_server('127.0.0.1', port, in_memory=True, default_bucket=BUCKET)
  server.start()
  return server


def environment(port: int) -> dict:
  """os.environ for a process whose gs:// paths go to the emulator."""
  url = f'http://127.0.0.1:{port}'
  return {**os.environ, 'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
          'EPATH_USE_TF': 'false', 'GOOGLE_CLOUD_PROJECT': 'test',
          # No metadata-server probe (seconds each) when google-auth finds no credentials.
          'NO_GCE_CHECK': 'True'}


def read(port: int, path: str) -> bytes:
  """The object gs://BUCKET/path, read over the emulator's JSON API."""
  url = (f'http://127.0.0.1:{port}/download/storage/v1/b/{BUCKET}/o/'
         f'{urllib.parse.quote(path, safe="")}?alt=media')
  with urllib.request.urlopen(url, timeout=30) as r:
    return r.read()


def exists(port: int, path: str) -> bool:
  """Whether gs://BUCKET/path is an object or a folder (a prefix of objects)."""
  query = urllib.parse.urlencode({'prefix': path.rstrip('/'), 'maxResults': 1})
  url = f'http://127.0.0.1:{port}/storage/v1/b/{BUCKET}/o?{query}'
  with urllib.request.urlopen(url, timeout=30) as r:
    import json  # pylint: disable=g-import-not-at-top
    return bool(json.loads(r.read()).get('items'))
