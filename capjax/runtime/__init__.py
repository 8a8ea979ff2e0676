"""The process around a run: multi-host start-up (distributed), XLA flags and huge pages chosen
before JAX starts (xla_flags, host_memory), and the files a run leaves in its workdir.
"""
