"""comfy.patcher_extension: the callback names a ModelPatcher calls, as in ComfyUI 0.8."""


class CallbacksMP:
    ON_CLONE = "on_clone"
    ON_LOAD = "on_load_after"
    ON_DETACH = "on_detach_after"
    ON_CLEANUP = "on_cleanup"
