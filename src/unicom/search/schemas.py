"""The request and reply models of ``unicom serve``'s HTTP API, as its OpenAPI description declares them.

Our own API (``/search``, ``/healthz``) and clip-retrieval's back-end API
(``/knn-service``, ``/indices-list``, ``/metadata``; field names as clip-retrieval's
``clip_back`` reads and writes them).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from unicom.search.queries import TEXT_WEIGHT


def _not_a_boolean(value: Any) -> Any:
    # pydantic reads true as 1 where a number is expected: {"like": true} would search item 1
    if isinstance(value, bool):
        raise PydanticCustomError("bool_not_number", "expected a number, got {value}", {"value": str(value).lower()})
    return value


Integer = Annotated[int, BeforeValidator(_not_a_boolean)]
Number = Annotated[float, BeforeValidator(_not_a_boolean)]


class SearchRequest(BaseModel):
    """The JSON body of ``POST /search`` (multipart forms take the same keys as fields)."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, description="a text, embedded by the model's text tower")
    image: str | None = Field(None, description="an image file, base64-encoded")
    like: Integer | None = Field(None, description="an item id: more like this item")
    embedding: list[Number] | None = Field(None, description="a query embedding (at least the index's dimensions)")
    text_weight: Number | None = Field(None, description="with a text and an image/item/embedding: the text's share, 0..1 "
                                                        f"(default {TEXT_WEIGHT})")
    k: Integer | None = Field(None, description="number of results")
    min_score: Number | None = Field(None, description="only results scoring at least this (a cosine similarity, -1..1): "
                                                       "fewer than k when fewer reach it")
    deduplicate: bool = Field(False, description="drop results that nearly repeat a better one")
    hide_duplicate_urls: bool = Field(False, description="drop results whose url repeats a better one's (clip-retrieval's "
                                                         "front end's \"hide duplicate urls\"; where the metadata has a "
                                                         "url column: /healthz's urls)")
    safe: bool = Field(False, description="leave out the results the server's safety filters mark (its --safety-column, "
                                          "LAION's --violence-prompts); refused where it has none (see /healthz)")
    index: str | None = Field(None, description="the index to search (default: the first)")
    modality: str | None = Field(None, description="the embeddings searched: 'image', or 'text' where the index holds "
                                                   "caption embeddings (clip-retrieval's text.index; /healthz's "
                                                   "modalities); default: the index's first")
    aesthetic_score: Integer | None = Field(None, description="0..9: move the query towards LAION's embedding of this "
                                                              "aesthetic rating (where the server has them: /healthz's "
                                                              "aesthetic)")
    aesthetic_weight: Number | None = Field(None, description="how far (default 0.5): query + weight x embedding, "
                                                              "re-normalised")
    multilingual: bool = Field(False, description="embed the text with the index's multilingual text model (texts "
                                                  "in fifty to a hundred languages; /healthz's multilingual)")


class Hit(BaseModel):
    """One result, with the item's metadata columns beside these."""

    model_config = ConfigDict(extra="allow")

    rank: int
    id: int
    score: float = Field(description="inner product of unit vectors (cosine similarity)")
    thumbnail: str | None = Field(description="URL of a thumbnail, when the image is on this server")
    link: str | None = Field(description="URL of the full image, or the item's own http(s) url")


class SearchReply(BaseModel):
    results: list[Hit]
    k: int
    index: str
    score_digits: int = Field(description="decimals that tell the scores apart")
    took_ms: float


class KnnRequest(BaseModel):
    """clip-retrieval's ``/knn-service`` request. The first of ``text``, ``image``/``image_url``,
    ``embedding_input`` that is given is the query, as in clip-retrieval."""

    model_config = ConfigDict(extra="allow")

    text: str | None = None
    image: str | None = Field(None, description="an image file, base64-encoded")
    image_url: str | None = Field(None, description="an http(s) URL of an image (only when the server allows it)")
    embedding_input: list[Number] | None = None
    modality: str = Field("image", description="the embeddings searched: 'image', or 'text' where the index "
                                                "holds caption embeddings (clip-retrieval's text.index)")
    num_images: Integer = Field(100, description="results that come with their metadata")
    num_result_ids: Integer | None = Field(None, description="results searched (default: num_images)")
    indice_name: str | None = Field(None, description="a name from /indices-list (default: the first)")
    deduplicate: bool = False
    use_mclip: bool = Field(False, description="embed the text with the multilingual text model (with "
                                               "--multilingual-model; unsupported, and named as such, without: the "
                                               "model's own text tower embeds it)")
    use_safety_model: bool = Field(False, description="leave out results that the metadata's safety column marks (with "
                                                      "--safety-column; unsupported, and named as such, without)")
    use_violence_detector: bool = Field(False, description="leave out results that LAION's violence prompts mark (with "
                                                           "--violence-prompts; unsupported, and named as such, without)")
    aesthetic_score: int | str | None = Field(None, description="0..9: move the query towards LAION's embedding of this "
                                                                "aesthetic rating (with --aesthetic-embeddings)")
    aesthetic_weight: float | str | None = Field(None, description="how far (default 0.5): query + weight x embedding, "
                                                                   "re-normalised")


class KnnResult(BaseModel):
    """One result of ``/knn-service``: the item's metadata (the first ``num_images``), its
    thumbnail as base64 JPEG in ``image`` when the image is on this server, ``id`` and ``similarity``."""

    model_config = ConfigDict(extra="allow")

    id: int
    similarity: float


class MetadataRequest(BaseModel):
    ids: list[Integer]
    indice_name: str | None = None


class MetadataItem(BaseModel):
    id: int
    metadata: dict[str, Any]


class IndexHealth(BaseModel):
    name: str
    count: int
    dims: int
    type: str
    model: str | None
    image_search: bool
    text_search: bool
    text_search_reason: str | None = Field(description="why text queries are refused, when they are")
    modalities: list[str] = Field(description="the embeddings /search's modality can search: image, and text where "
                                              "the index holds caption embeddings")
    multilingual: bool = Field(description="whether /search takes multilingual: the index has a multilingual text model")
    multilingual_model: str | None = Field(None, description="that model, by name (the one --multilingual-model gave, "
                                                             "or the one that embedded the index's captions)")
    urls: bool = Field(description="whether /search takes hide_duplicate_urls: the metadata has a url column")


class Health(IndexHealth):
    """The first index's description, all the indexes, the limits and the query counters."""

    model_config = ConfigDict(extra="allow")

    status: str
    indices: list[IndexHealth]
    default_k: int
    max_k: int
    max_upload_bytes: int
    max_pixels: int
    safe_search: bool = Field(description="whether /search takes safe: a safety column or violence prompts filter results")
    aesthetic: bool = Field(description="whether /search takes aesthetic_score: the server has LAION's aesthetic embeddings")
    queries: int
    batches: int

