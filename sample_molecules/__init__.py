"""Sample molecules shipped with se3t (installed as the package ``se3tcli.samples``)."""
