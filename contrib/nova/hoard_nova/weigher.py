"""A Nova scheduler weigher that asks hoard where an image's chunks are.

One HTTP call per scheduling request: ``GET {api_url}/v1/place?image=ID``
to a hoard daemon (the local one), for ``request_spec.image.id`` (the Glance
image ID; hoard knows the images it holds from Glance by that ID). Each host
is weighed by its hoard score in [0, 1]: the share of the image's boot working
set it holds locally, then the share of the whole image, then its load.

Configuration (nova.conf)::

    [filter_scheduler]
    weight_classes = nova.scheduler.weights.all_weighers,hoard_nova.weigher.HoardWeigher

    [hoard]
    api_url = http://127.0.0.1:7480
    api_token = ...            # the daemon's API token (data_dir/api.token)
    timeout = 0.5              # seconds; on a timeout every host weighs the same
    weight_multiplier = 1.0    # per aggregate: metadata hoard_weight_multiplier

The environment variables ``HOARD_API_URL`` and ``HOARD_API_TOKEN`` win over
nova.conf. A timeout or any error weighs every host equally (0), logs once
until hoard answers again, and never fails a boot.
"""

import json
import os
import urllib.error
import urllib.parse
import urllib.request

from oslo_config import cfg
from oslo_log import log as logging

from nova.scheduler import utils
from nova.scheduler import weights

LOG = logging.getLogger(__name__)
CONF = cfg.CONF

hoard_group = cfg.OptGroup("hoard", title="hoard placement weigher")
hoard_opts = [
    cfg.StrOpt("api_url", default="http://127.0.0.1:7480",
               help="Admin API of a hoard daemon (env HOARD_API_URL wins)."),
    cfg.StrOpt("api_token", default="", secret=True,
               help="hoard API token (data_dir/api.token; env HOARD_API_TOKEN wins)."),
    cfg.FloatOpt("timeout", default=0.5, min=0.01,
                 help="Seconds to wait for hoard; then every host weighs the same."),
    cfg.FloatOpt("weight_multiplier", default=1.0,
                 help="Multiplier of the hoard weight; overridden per aggregate by "
                      "the metadata key hoard_weight_multiplier. Negative values "
                      "would avoid hosts that hold the image."),
    cfg.IntOpt("max_hosts_in_query", default=100, min=0,
               help="Name the candidate hosts in the query when there are at most "
                    "this many; else ask for every node."),
]
CONF.register_group(hoard_group)
CONF.register_opts(hoard_opts, group=hoard_group)


def list_opts():
    """The options, for oslo-config-generator."""
    return [(hoard_group, hoard_opts)]


def _image_id(request_spec):
    try:
        image = request_spec.image
        if image is None:
            return None
        if hasattr(image, "obj_attr_is_set") and not image.obj_attr_is_set("id"):
            return None
        return image.id
    except Exception:  # an unset field raises; no image: weigh nothing
        return None


class HoardWeigher(weights.BaseHostWeigher):
    """Weigh hosts by the share of the image hoard holds on them.

    The weight of a host is its hoard score in [0, 1] (minval 0 and maxval 1,
    so Nova's normalisation keeps it as is); hosts hoard does not know weigh 0.
    """

    # Scores are absolute: keep them, do not stretch the spread of this request.
    minval = 0.0
    maxval = 1.0

    # Whether the last call failed: shared by every instance in the process,
    # so an outage is logged once however often the scheduler asks.
    _failing = False

    def weight_multiplier(self, host_state):
        return utils.get_weight_multiplier(
            host_state, "hoard_weight_multiplier", CONF.hoard.weight_multiplier)

    def _config(self):
        url = os.environ.get("HOARD_API_URL") or CONF.hoard.api_url
        token = os.environ.get("HOARD_API_TOKEN") or CONF.hoard.api_token
        return url.rstrip("/"), token

    def _scores(self, image_id, hosts):
        """Ask hoard once; return {host: score}, or {} on any failure."""
        url, token = self._config()
        q = {"image": image_id}
        if 0 < len(hosts) <= CONF.hoard.max_hosts_in_query:
            q["hosts"] = ",".join(sorted(set(hosts)))
        req = urllib.request.Request(url + "/v1/place?" + urllib.parse.urlencode(q))
        if token:
            req.add_header("Authorization", "Bearer " + token)
        try:
            with urllib.request.urlopen(req, timeout=CONF.hoard.timeout) as resp:
                body = json.loads(resp.read(8 << 20).decode("utf-8"))
            listed = body.get("hosts", []) if isinstance(body, dict) else body
            scores = {}
            for h in listed:
                name, score = h.get("host"), float(h.get("score", 0.0))
                if name and name not in scores:
                    scores[name] = min(max(score, 0.0), 1.0)
        except Exception as exc:  # timeouts, refused, HTTP errors, bad JSON
            if not HoardWeigher._failing:
                HoardWeigher._failing = True
                LOG.warning("hoard weigher: no placement from %s for image %s (%s); "
                            "every host weighs the same until hoard answers again",
                            url, image_id, exc)
            return {}
        if HoardWeigher._failing:
            HoardWeigher._failing = False
            LOG.info("hoard weigher: %s answers again", url)
        return scores

    def weigh_objects(self, weighed_obj_list, request_spec):
        image_id = _image_id(request_spec)
        scores = {}
        if image_id and weighed_obj_list:
            scores = self._scores(str(image_id), [w.obj.host for w in weighed_obj_list])
        return [scores.get(w.obj.host, 0.0) for w in weighed_obj_list]

    def _weigh_object(self, host_state, request_spec):
        # One call per request is weigh_objects' job; a lone host asks alone.
        image_id = _image_id(request_spec)
        if not image_id:
            return 0.0
        return self._scores(str(image_id), [host_state.host]).get(host_state.host, 0.0)
